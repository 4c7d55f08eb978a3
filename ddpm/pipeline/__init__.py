"""The workflows the DVC stages and the CLI call: the file layout, resume state, train, sample, evaluate
and the benchmark."""
