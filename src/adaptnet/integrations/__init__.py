"""Growth in other people's training loops: PyTorch Lightning and Hugging Face ``Trainer`` callbacks.

Both are thin: the same policy objects as adaptnet's own ``Trainer`` decide, the same edit
functions carry the optimizer the other loop holds (parameters keep their identity), and the
decision-and-apply loop is ``adaptnet.train._edits.run_policies``, shared with that Trainer.
Import the submodule of the framework you use (each needs its extra: ``[lightning]``, ``[hf]``)::

    from adaptnet.integrations.lightning import AdaptnetCallback
    from adaptnet.integrations.transformers import AdaptnetCallback
"""
