"""EvoPrompt internals: variation operators (LLM templates, lexical) and the search (scorer, GA, DE)."""
