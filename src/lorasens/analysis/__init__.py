"""Gradient and sensitivity analysis of the LoRA modules.

- `measures`: the tensor maths (fused gradient norms, Taylor importance, ||delta W|| from Gram matrices).
- `callbacks`: the Trainer callback that records them while training (pre-clipping gradients, buffered CSVs).
- `ablation`: validation loss with groups / layers / module types / single modules switched off.
- `sensitivity`: per-module scores, rankings, Spearman agreement, the budget recommendation as a PEFT LoraConfig.
- `post`: the analysis after training and for `lorasens analyze RUN_DIR` (reads only the run's files and model).
"""
