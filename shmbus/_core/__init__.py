"""The shared-memory core of :class:`~shmbus.ShmBus`: private to the package.

Nothing here is public API; the transports in :mod:`shmbus` are. The modules,
each opening with the rules it keeps:

=================  ==========================================================
:mod:`.layout`     every offset, size and lock byte of the files, one place
:mod:`.ordering`   the memory fences named next to each shared read and write
:mod:`.shmfiles`   names in ``/dev/shm``, creating and opening them safely
:mod:`.procs`      process identity (pid and start time)
:mod:`.ofd`        byte locks the kernel releases when their holder dies
:mod:`.segment`    the bus segment: attach, detach, subscriber slots
:mod:`.ring`       one publisher's ring: the single-writer append protocol
:mod:`.directory`  finding, retiring and reclaiming the publishers' rings
:mod:`.wakeup`     a sleeping reader's doorbell
:mod:`.reader`     a process's reader: follows every ring, routes events
:mod:`.inspection` reading a bus from outside (``shmbus ls``/``stat``)
:mod:`.leftovers`  removing the files of dead buses (``shmbus clean``)
=================  ==========================================================
"""
