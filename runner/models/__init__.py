"""Models: the interface, Python models, formula models (parse, design, model) and priors."""
