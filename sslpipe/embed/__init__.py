"""Using a backbone beyond probes: embeddings of every image (`embed`), similarity search over them (`search`); the
on-disk form they share (`store`)."""
