# Stub of airio.core: placeholder classes so t5x.utils imports; never instantiated in the AOT train-step path.
class Task: pass
class Mixture: pass
class AirIODatasetIterator: pass
class DatasetProviderBase: pass
class _DP:
  @staticmethod
  def get_vocabularies(*a, **k): raise NotImplementedError('airio stub')
dataset_providers = _DP()
