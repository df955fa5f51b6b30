"""Input and output: safe image loading, the URL guard, storage, the adapter registry."""
