"""The base model and its LoRA modules: loading and quantizing the model, the module map (which module is which
group, layer and type), the LoRA layers and their norms, phase schedules as data, and tensor helpers."""
