"""The project's own parallel multilingual safety dataset (see DATA_CARD.md).

train.jsonl and test.jsonl are the shipped files; build.py regenerates them from source/.
"""
