"""Smoke test with the official RocketMQ 5 Python client against RaftMQ.

usage: python_smoke.py ENDPOINTS TOPIC COUNT
A producer sends COUNT messages; a simple consumer receives and acks them all.
Exits non-zero on any mismatch.
"""
import sys
import time

from rocketmq import (ClientConfiguration, Credentials, FilterExpression,
                      Message, Producer, SimpleConsumer)


def main():
    endpoints, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = ClientConfiguration(endpoints, Credentials())
    producer = Producer(config, (topic,))
    producer.startup()
    sent = {}
    try:
        for i in range(count):
            m = Message()
            m.topic = topic
            m.body = f"py-{i}".encode()
            m.tag = "TagA"
            m.keys = f"key-{i}"
            m.add_property("seq", str(i))
            receipt = producer.send(m)
            sent[f"py-{i}"] = receipt.message_id
    finally:
        producer.shutdown()
    print(f"python: sent {len(sent)}", flush=True)

    consumer = SimpleConsumer(config, "py-group", {topic: FilterExpression("*")}, await_duration=5)
    consumer.startup()
    got = {}
    deadline = time.time() + 90
    try:
        while len(got) < len(sent) and time.time() < deadline:
            try:
                batch = consumer.receive(16, 15)
            except Exception as e:  # a transient error: retry, as an application would
                print(f"python: receive failed, retrying: {e}", flush=True)
                time.sleep(0.5)
                continue
            for m in batch:
                body = m.body.decode()
                assert m.topic == topic, m.topic
                assert m.tag == "TagA", m.tag
                assert m.properties.get("seq") == body.split("-")[1], m.properties
                got[body] = m.message_id
                consumer.ack(m)
    finally:
        consumer.shutdown()
    missing = set(sent) - set(got)
    unexpected = set(got) - set(sent)
    ids_match = all(sent[b] == got[b] for b in got if b in sent)
    print(f"python: received and acked {len(got)}, missing {len(missing)}, unexpected {len(unexpected)}, ids match {ids_match}")
    if missing or unexpected or not ids_match:
        sys.exit(1)


if __name__ == "__main__":
    main()
