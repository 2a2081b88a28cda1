"""The demo pool: tiny Llama models trained here on synthetic skills, with lm-eval task suites.

`recycler.zoo.build.build_zoo` writes it; README.md beside this file says what is in
it and how good a pool it is.
"""
