"""The product layer over the library: orchestration of whole experiments (``stages``)
and exporting trained runs (``export``); ``tools/`` are thin shells over these."""
