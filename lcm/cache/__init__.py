"""KV caches and the policies that compress them.

The policy registry is imported first, so that a policy module that subclasses :class:`~lcm.cache.policies.KVPolicy`
(:mod:`lcm.cache.infinipot`) can be imported on its own without a circular import.
"""

from lcm.cache import policies as policies
