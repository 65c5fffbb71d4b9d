"""Which dimensions are coupled: a model's graph, traced once, turned into named unit groups."""

from adaptnet.groups.tracing import Trace, find_group, inputs_for, output_tensors, structure_key, trace, unit_groups

__all__ = ["Trace", "find_group", "inputs_for", "output_tensors", "structure_key", "trace", "unit_groups"]
