"""ACL with the official RocketMQ 5 Python client against RaftMQ.

usage: python_acl.py ENDPOINT ACCESS_KEY SECRET_KEY TOPIC
Sends one message with these credentials and prints `sent <id>`, or
`refused <code> <message>` when the broker refuses it.
"""
import sys

from rocketmq import ClientConfiguration, Credentials, Message, Producer


def main():
    endpoint, ak, sk, topic = sys.argv[1:5]
    producer = Producer(ClientConfiguration(endpoint, Credentials(ak, sk)), (topic,))
    try:
        producer.startup()
        m = Message()
        m.topic = topic
        m.body = b"acl"
        print("sent", producer.send(m).message_id, flush=True)
    except Exception as e:  # the broker's refusal, as the client reports it
        print("refused", type(e).__name__, str(e)[:300], flush=True)
    finally:
        try:
            producer.shutdown()
        except Exception:
            pass


if __name__ == "__main__":
    main()
