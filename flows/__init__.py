"""Entry points: thin flows that parse a config, call one function of components/, and print one JSON line."""
