"""Ray program: util queue."""
import ray
ray.init(num_cpus=2)
from ray.util.queue import Queue, Empty
q = Queue(maxsize=3)
@ray.remote
def producer(q, n):
    for i in range(n):
        q.put(i)
    return n
ray.get(producer.remote(q, 3))
print(q.qsize(), q.full(), q.empty())
print([q.get(timeout=10) for _ in range(3)])
try:
    q.get(block=False)
except Empty:
    print("Empty")
q.put_nowait_batch([1, 2])
print(q.get_nowait_batch(2))
