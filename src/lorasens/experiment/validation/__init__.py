"""`lorasens validate`: does a placement beat the others at equal LoRA parameters, each at its own tuned learning rate?

- `arms`: the placements compared (lorasens', PEFT's and controls) as data, each a PEFT config file;
- `peers`: the arms that need the base model or data to build (EVA, GoRA, KappaTune, AdaLoRA);
- `stats`: paired bootstrap over training units and test prompts, Holm's correction, verdicts;
- `driver`: plan -> learning-rate sweep -> seeded trainings -> test scores, resumable;
- `outputs`: the summary JSON, the CSV files and the plot.
"""
