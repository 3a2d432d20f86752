"""upasmail's benchmark (``bench/run``); see bench/README.rst."""
