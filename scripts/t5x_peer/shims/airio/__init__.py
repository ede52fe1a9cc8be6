# Stub (not the real airio): T5X's utils.py imports airio only for data-pipeline isinstance checks.
