"""worker.gate.SlotGate: the line jobs sent ahead wait in for one of a worker's slots."""

import asyncio

from worker.gate import SlotGate


def test_jobs_beyond_the_slots_wait_in_order_and_a_freed_slot_goes_to_the_oldest():
    async def main():
        gate = SlotGate(2)
        order = []

        async def job(n):
            assert await gate.enter()
            order.append(n)

        assert await gate.enter() and await gate.enter()
        waiting = [asyncio.create_task(job(n)) for n in (1, 2, 3)]
        await asyncio.sleep(0)
        assert gate.waiting() == 3 and order == []
        gate.leave()
        await asyncio.sleep(0)
        assert order == [1]
        gate.leave()
        gate.leave()
        await asyncio.gather(*waiting)
        assert order == [1, 2, 3] and gate.free == 0

    asyncio.run(main())


def test_a_waiting_job_cancelled_leaves_the_line_and_one_cancelled_as_it_got_a_slot_passes_it_on():
    async def main():
        gate = SlotGate(1)
        assert await gate.enter()
        first = asyncio.create_task(gate.enter())
        second = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        gate.leave()  # the slot is first's ...
        first.cancel()  # ... but it is cancelled before it runs: second gets the slot
        assert await second is True
        assert first.cancelled() and gate.free == 0 and gate.waiting() == 0
        third = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        third.cancel()
        await asyncio.sleep(0)
        assert gate.waiting() == 0
        gate.leave()
        assert gate.free == 1

    asyncio.run(main())


def test_a_closed_gate_turns_away_those_waiting_and_those_to_come():
    async def main():
        gate = SlotGate(1)
        assert await gate.enter()
        waiting = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        gate.close()
        assert await waiting is False
        assert await gate.enter() is False

    asyncio.run(main())
