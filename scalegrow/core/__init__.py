"""The core: the model config and its feature records, the tensor table, the reference model, layout rules."""
