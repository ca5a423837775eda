"""The security corpus of remote blocks (``corpus.ENTRIES``)."""
