"""Fold rules: each module matches a pattern, checks it (returning a Refusal with a reason when it
says no) and computes a replacement. None of them edits a model; the rewrite (`bnfold.rewrite`, through `bnfold.edits`) does."""
