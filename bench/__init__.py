"""Benchmarks of the gateway against direct Kubo and nginx (``make bench``; not part of ``make test``)."""
