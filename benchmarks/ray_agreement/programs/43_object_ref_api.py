"""Ray program: object ref api."""
import ray
ray.init(num_cpus=2)
import asyncio
r = ray.put(5)
print(r == ray.ObjectRef(r.binary()), hash(r) == hash(ray.ObjectRef(r.binary())))
print(r.future().result(timeout=10))
async def main():
    return await r
print(asyncio.run(main()))
print(isinstance(r.hex(), str))
