"""pytest plugin for the gmqtt suite's MQTT 3.1.1 pass (loaded with ``-p gmqtt_v311``).

gmqtt's broker tests connect with MQTT 5 unless a test asks otherwise. This plugin makes 3.1.1
the default protocol level of ``gmqtt.Client.connect``, so the version-agnostic tests exercise
the broker's 3.1.1 code path. Tests that name a version keep it. Tests of MQTT 5-only features
are deselected by tests/python/test_conformance.py, not here.
"""

import functools

import gmqtt
from gmqtt.mqtt.constants import MQTTv311

_connect = gmqtt.Client.connect


@functools.wraps(_connect)
async def _connect_v311(self, host, port=1883, ssl=False, keepalive=60, version=MQTTv311, raise_exc=True):
    return await _connect(self, host, port=port, ssl=ssl, keepalive=keepalive, version=version, raise_exc=raise_exc)


gmqtt.Client.connect = _connect_v311
