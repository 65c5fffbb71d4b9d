"""Which dimensions are coupled: a model's graph, traced once, turned into named unit groups."""

from adaptnet.groups.trace import Trace, find_group, inputs_for, structure_key, trace, unit_groups

__all__ = ["Trace", "find_group", "inputs_for", "structure_key", "trace", "unit_groups"]
