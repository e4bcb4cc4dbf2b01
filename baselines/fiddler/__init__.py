"""Fiddler (Kamahori et al., arXiv 2402.07033; efeslab/fiddler@227715b) as a placement / execution
policy of the ScheInfer engine: see policy.py. Importing the package registers the policy
'fiddler'."""
from . import policy  # noqa: F401  (registers the engine policy 'fiddler')
