"""Imported at the start of each process of the test that preloads hold.cpp (this directory is on
its PYTHONPATH): registered before any other atexit hook, _release runs after all of them, just
before the interpreter starts finalizing, and lets gloo's held thread go."""
import atexit
import ctypes
import os
import sys


def _release():
    # The released thread waits for the GIL; with a 20 ms switch interval it asks for it only
    # after this thread has gone on into finalization, where no bytecode hands it over.
    sys.setswitchinterval(0.02)
    ctypes.PyDLL(os.environ["HELD_GLOO_THREAD"]).release()  # PyDLL: the GIL stays held


atexit.register(_release)
