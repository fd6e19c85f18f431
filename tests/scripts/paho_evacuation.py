"""paho-mqtt MQTT 5 clients through mqttlb during an evacuation (Debian's
python3-paho-mqtt).

Usage: paho_evacuation.py HOST PORT CLIENTS COUNT

CLIENTS clients (ids paho-0...) subscribe to the retained `mqttlb/whoami` and
reconnect by themselves (paho's loop) whenever a session ends. A publisher
(`qos1-pub`, persistent session) waits for a line `publish` on stdin, then publishes
COUNT QoS 1 messages on `evac/seq` (payload: the sequence number), 100 a second,
resending what was not acknowledged after a reconnect, as paho does.

Prints one JSON object per line: {"id", "node"} for each whoami message,
{"id", "disconnect", "reference"} for each DISCONNECT from the server, {"id",
"closed"} for a session that ended without one, {"published", "acked"} when the
publisher is done. Runs until stdin closes.
"""

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

out_lock = threading.Lock()


def emit(obj):
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def make(client_id):
    # paho 2.x asks for the callback API version; 1.6 (bookworm) has no such argument.
    if hasattr(mqtt, "CallbackAPIVersion"):
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION1, client_id=client_id, protocol=mqtt.MQTTv5
        )
    else:
        c = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(min_delay=1, max_delay=2)
    return c


def report_disconnect(client_id):
    def on_disconnect(_client, _userdata, reason, props):
        value = int(reason.value) if hasattr(reason, "value") else int(reason)
        reference = getattr(props, "ServerReference", None) if props else None
        # A server's DISCONNECT carries a reason code (0x80 and up here); a lost
        # connection is paho's own error number.
        if value >= 0x80:
            emit({"id": client_id, "disconnect": value, "reference": reference})
        else:
            emit({"id": client_id, "closed": value})

    return on_disconnect


def watcher(host, port, client_id):
    c = make(client_id)

    def on_connect(client, _userdata, _flags, reason, _props):
        if int(reason.value) == 0:
            client.subscribe("mqttlb/whoami", qos=0)

    def on_message(_client, _userdata, msg):
        emit({"id": client_id, "node": msg.payload.decode()})

    c.on_connect = on_connect
    c.on_message = on_message
    c.on_disconnect = report_disconnect(client_id)
    c.connect(host, port, keepalive=30)
    c.loop_start()
    return c


def publisher(host, port, count, go):
    c = make("qos1-pub")
    acked = set()
    lock = threading.Lock()

    def on_publish(_client, _userdata, mid):
        with lock:
            acked.add(mid)

    c.on_publish = on_publish
    c.on_disconnect = report_disconnect("qos1-pub")
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    c.connect(host, port, keepalive=30, clean_start=False, properties=props)
    c.loop_start()
    go.wait()
    mids = []
    for seq in range(count):
        info = c.publish("evac/seq", str(seq), qos=1)
        mids.append(info.mid)
        time.sleep(0.01)
    deadline = time.time() + 30
    while time.time() < deadline:
        with lock:
            if all(m in acked for m in mids):
                break
        time.sleep(0.05)
    with lock:
        emit({"published": count, "acked": sum(1 for m in mids if m in acked)})


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    clients, count = int(sys.argv[3]), int(sys.argv[4])
    watchers = [watcher(host, port, f"paho-{i}") for i in range(clients)]
    go = threading.Event()
    threading.Thread(target=publisher, args=(host, port, count, go), daemon=True).start()
    for line in sys.stdin:
        if line.strip() == "publish":
            go.set()
    for w in watchers:
        w.loop_stop()


if __name__ == "__main__":
    main()
