"""`splitfed audit`: the curious trunk operator's attacks on the cut activations, and what defends.

One module one job: texts (victim and shadow text), cut (what the head sends at a cut; the trained,
defended head), attacks, metrics, utility (the fine-tune cost of a defense, learned defenses trained
there), runner (the `invert` grid of cuts and defenses), report (its JSON, Markdown, PNG), defended
(the `defend` grid: each defense against an attacker retrained on it), defend_report, and command
(the click CLI).
"""
