"""Models with a functional boundary: `apply_fn(params, *inputs)`; BERT / all-MiniLM-L6-v2 and zero-shot heads."""
