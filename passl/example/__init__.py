"""The offline example: digit scenes (scenes.py) and the end-to-end Token Labeling workflow on them (demo.py).

Not used by training on other data; ``make demo`` (tools/demo.py) and tools/make_example.py run it.
"""
