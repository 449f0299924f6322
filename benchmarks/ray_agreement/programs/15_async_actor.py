"""Ray program: async actor."""
import ray
ray.init(num_cpus=2)
import asyncio
@ray.remote
class A:
    def __init__(self):
        self.ev = asyncio.Event()
    async def wait(self):
        await self.ev.wait()
        return "woke"
    async def set(self):
        self.ev.set()
        return "set"
a = A.remote()
w = a.wait.remote()
print(ray.get(a.set.remote(), timeout=30), ray.get(w, timeout=30))
async def main():
    return await a.set.remote()
print(asyncio.run(main()))
