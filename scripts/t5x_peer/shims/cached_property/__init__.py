# Stub of the cached_property package using the stdlib equivalent.
from functools import cached_property
