"""MQTT 5 publish/subscribe through mqttlb with paho-mqtt (Debian's python3-paho-mqtt).

Usage: paho_mqtt5_pubsub.py HOST PORT TOPIC COUNT

A subscriber (QoS 1) and a publisher connect with MQTT 5; the publisher sends COUNT
QoS 1 messages, each with a user property and a content type, and waits for every
PUBACK. Prints one JSON object describing what happened; the Rust test asserts on it.
Exits 1 on a timeout or a refused connection (the JSON says which).
"""

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TIMEOUT = 60.0


def client(client_id):
    # paho 2.x asks for the callback API version; 1.6 (bookworm) has no such argument.
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION1, client_id=client_id, protocol=mqtt.MQTTv5
        )
    return mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv5)


def wait(event, what, report):
    if not event.wait(TIMEOUT):
        report["error"] = f"timed out waiting for {what}"
        print(json.dumps(report))
        sys.exit(1)


def main():
    host, port, topic, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    report = {"connack": [], "subscribed": False, "puback": 0, "received": []}
    lock = threading.Lock()
    connected = {"sub": threading.Event(), "pub": threading.Event()}
    subscribed = threading.Event()
    all_received = threading.Event()

    def on_connect(role):
        def handler(_client, _userdata, _flags, reason, _properties):
            report["connack"].append([role, int(reason.value)])
            connected[role].set()

        return handler

    def on_subscribe(_client, _userdata, _mid, reasons, _properties):
        report["subscribed"] = all(int(r.value) == 1 for r in reasons)  # granted QoS 1
        subscribed.set()

    def on_message(_client, _userdata, msg):
        props = dict(getattr(msg.properties, "UserProperty", []) or [])
        content_type = getattr(msg.properties, "ContentType", None)
        with lock:
            report["received"].append(
                [msg.payload.decode(), msg.qos, props.get("seq"), content_type]
            )
            if len(report["received"]) >= count:
                all_received.set()

    connect_props = Properties(PacketTypes.CONNECT)
    connect_props.SessionExpiryInterval = 0

    sub = client(f"{topic}-paho-sub")
    sub.on_connect = on_connect("sub")
    sub.on_subscribe = on_subscribe
    sub.on_message = on_message
    sub.connect(host, port, keepalive=30, clean_start=True, properties=connect_props)
    sub.loop_start()
    wait(connected["sub"], "the subscriber's CONNACK", report)
    sub.subscribe(topic, options=mqtt.SubscribeOptions(qos=1))
    wait(subscribed, "the SUBACK", report)

    pub = client(f"{topic}-paho-pub")
    pub.on_connect = on_connect("pub")
    pub.connect(host, port, keepalive=30, clean_start=True, properties=connect_props)
    pub.loop_start()
    wait(connected["pub"], "the publisher's CONNACK", report)

    deadline = time.monotonic() + TIMEOUT
    infos = []
    for i in range(count):
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("seq", str(i))
        props.ContentType = "text/plain"
        infos.append(pub.publish(topic, f"m5-{i}", qos=1, properties=props))
    for info in infos:
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
    report["puback"] = sum(1 for info in infos if info.is_published())

    all_received.wait(max(0.0, deadline - time.monotonic()))
    pub.disconnect()
    sub.disconnect()
    pub.loop_stop()
    sub.loop_stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
