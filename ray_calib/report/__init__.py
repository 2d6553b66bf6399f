"""Plots and a text summary of measurements: what the ranges look like and which experts saw tokens.

extract   per-layer KV / activation / weight figures from a TP1 rank file
plots     the PNGs (matplotlib, Agg)
build     load runs (unify to TP1), make the plots, write summary.txt
"""
