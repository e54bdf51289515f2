"""`splitfed audit`: the curious trunk operator's attacks on the cut activations, and what defends.

One module one job: texts (victim and shadow text), cut (what the head sends at a cut), attacks,
metrics, utility (the fine-tune cost of a defense), runner (the grid of cuts and defenses), report
(JSON, Markdown, PNG) and command (the click CLI).
"""
