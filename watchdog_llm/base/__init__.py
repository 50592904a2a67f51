"""Pure helpers and shared vocabularies. A leaf: imports nothing of the project (`make layers`)."""
