"""Training: the run object (RunContext, also what `load_run` returns), the Trainer and its datasets, sequence
packing, phase schedules as a callback, and the PEFT methods."""
