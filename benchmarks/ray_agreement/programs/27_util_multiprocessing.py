"""Ray program: util multiprocessing."""
import ray
ray.init(num_cpus=2)
from ray.util.multiprocessing import Pool
def sq(x):
    return x * x
def add(a, b):
    return a + b
with Pool(2) as p:
    print(p.map(sq, range(5)))
    print(sorted(p.imap_unordered(sq, range(5))))
    print(p.starmap(add, [(1, 2), (3, 4)]))
    print(p.apply_async(sq, (9,)).get(timeout=30))
    print(list(p.imap(sq, range(3))))
