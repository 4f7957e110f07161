"""The Llama-family decoder: params (NNX-declared pytrees) and pure functions."""
