raise RuntimeError("the repository's custom encoder code must never run")
