"""Pure model code for the bayesDREAM technical fit.

Imports torch, pyro, numpy and the standard library only: no orchestration, no
files, no environment variables (a test enforces it).
"""
