"""Building blocks of the generation stage (pipeline/generate.py): the system-prompt library, the
teachers and their request cache, and data hygiene (dedup, decontamination, preference binarization)."""
