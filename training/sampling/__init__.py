"""The sampling package (ARCHITECTURE.md "Sampling as four orthogonal pieces"); see the modules' docstrings.

Imports nothing on purpose: training/networks.py and training/loss.py import `schedules` from here, and the other
modules import the networks' helpers, so an eager import would close a circle.
"""
