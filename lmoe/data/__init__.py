"""What a model reads: records from files and the built-in data, chat encoding into token ids with
labels, multiple-choice questions, the offline benchmarks and the hash splits."""
