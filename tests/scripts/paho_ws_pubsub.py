"""MQTT over WebSocket through mqttlb with paho-mqtt (Debian's python3-paho-mqtt).

Usage: paho_ws_pubsub.py HOST PORT TOPIC COUNT PROTOCOL [CAFILE]

One client (transport "websockets", path /mqtt; TLS when CAFILE is given; PROTOCOL 4
for MQTT 3.1.1, 5 for MQTT 5) subscribes to TOPIC at QoS 1, then publishes COUNT QoS 1
messages to it: every message goes client -> broker and back broker -> client over the
same WebSocket. Prints one JSON object; exits 1 on a timeout or a refused connection.
"""

import json
import sys
import threading

import paho.mqtt.client as mqtt

TIMEOUT = 30.0


def main():
    host, port, topic, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    protocol = mqtt.MQTTv5 if sys.argv[5] == "5" else mqtt.MQTTv311
    cafile = sys.argv[6] if len(sys.argv) > 6 else None
    report = {"connack": None, "received": [], "error": None}
    connected, subscribed, done = threading.Event(), threading.Event(), threading.Event()
    lock = threading.Lock()

    kwargs = {"client_id": f"{topic}-ws", "protocol": protocol, "transport": "websockets"}
    if hasattr(mqtt, "CallbackAPIVersion"):
        kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION1
    c = mqtt.Client(**kwargs)
    c.ws_set_options(path="/mqtt")
    if cafile:
        c.tls_set(ca_certs=cafile)

    def on_connect(_c, _u, _flags, rc, _props=None):
        report["connack"] = int(getattr(rc, "value", rc))
        connected.set()

    def on_subscribe(_c, _u, _mid, _granted, _props=None):
        subscribed.set()

    def on_message(_c, _u, msg):
        with lock:
            report["received"].append(msg.payload.decode())
            if len(report["received"]) >= count:
                done.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, port, keepalive=30)
    c.loop_start()
    for event, what in [(connected, "CONNACK"), (subscribed, "SUBACK")]:
        if what == "SUBACK":
            c.subscribe(topic, qos=1)
        if not event.wait(TIMEOUT):
            report["error"] = f"timed out waiting for {what}"
            print(json.dumps(report))
            sys.exit(1)
    for i in range(count):
        c.publish(topic, f"m{i}", qos=1)
    if not done.wait(TIMEOUT):
        report["error"] = "timed out waiting for the messages"
    c.disconnect()
    c.loop_stop()
    print(json.dumps(report))
    sys.exit(0 if report["error"] is None and report["connack"] == 0 else 1)


if __name__ == "__main__":
    main()
