"""What a finished run shows: the HTML report and its plots, the one-paragraph answer, exported files and the
TensorBoard scalars."""
