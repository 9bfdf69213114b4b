"""Kernel implementations behind the public ops (one subpackage per kernel language)."""
