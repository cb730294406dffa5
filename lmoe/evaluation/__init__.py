"""Scoring a model (answer log-probabilities, perplexity, exact match, multiple choice, benchmarks)
and analysing its routing (specialisation by domain, plots)."""
