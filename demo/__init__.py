"""GLUScope demo: the stdlib corpus and the tiny demo model trained on it."""
