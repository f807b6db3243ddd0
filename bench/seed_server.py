# mypy: ignore-errors
# (the seed is kept as the tutorial wrote it; its untyped code is the baseline, not ours)
#
# chat_server.py
#
# The seed: chat_server.py from the bogotobogo tutorial "Network Programming II -
# Chat Server & Client" (/work/shared/seeds/000_cffc2d15777a59f7.txt), ported to
# Python 3 for bench/ and otherwise unchanged: listen(10), blocking sockets, a
# blocking select() over every socket, one recv(4096) chunk relayed as is to every
# other socket with the "\n[<peername>: " prefix, the "entered"/"offline" notices.
#
# Changes, all required by Python 3 or by the benchmark:
#  * print() calls; str -> bytes (.encode()) where text meets the wire;
#  * optional `seed_server.py [PORT [HOST]]` so bench/ can use a free loopback
#    port; without arguments it listens on '' 9009 exactly as the original.
# The scraped page shows the recv error handler twice (`except: pass` and
# `except: broadcast(... offline ...); continue`); the latter, the complete
# listing's continuation, is kept.

import sys
import socket
import select

HOST = sys.argv[2] if len(sys.argv) > 2 else ''
SOCKET_LIST = []
RECV_BUFFER = 4096
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9009

def chat_server():

    server_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server_socket.bind((HOST, PORT))
    server_socket.listen(10)

    # add server socket object to the list of readable connections
    SOCKET_LIST.append(server_socket)

    print("Chat server started on port " + str(PORT))

    while 1:

        # get the list sockets which are ready to be read through select
        # 4th arg, time_out  = 0 : poll and never block
        ready_to_read,ready_to_write,in_error = select.select(SOCKET_LIST,[],[])

        for sock in ready_to_read:
            # a new connection request recieved
            if sock == server_socket:
                sockfd, addr = server_socket.accept()
                SOCKET_LIST.append(sockfd)
                print("Client (%s, %s) connected" % addr)

                broadcast(server_socket, sockfd, ("[%s:%s] entered our chatting room\n" % addr).encode())

            # a message from a client, not a new connection
            else:
                # process data recieved from client,
                try:
                    # receiving data from the socket.
                    data = sock.recv(RECV_BUFFER)
                    if data:
                        # there is something in the socket
                        broadcast(server_socket, sock, ("\n" + '[' + str(sock.getpeername()) + ': ').encode() + data)
                    else:
                        # remove the socket that's broken
                        if sock in SOCKET_LIST:
                            SOCKET_LIST.remove(sock)

                        # at this stage, no data means probably the connection has been broken
                        broadcast(server_socket, sock, ("Client (%s, %s) is offline\n" % sock.getpeername()).encode())

                # exception
                except:
                    broadcast(server_socket, sock, ("Client (%s, %s) is offline\n" % addr).encode())
                    continue

    server_socket.close()

# broadcast chat messages to all connected clients
def broadcast (server_socket, sock, message):
    for socket in SOCKET_LIST:
        # send the message only to peer
        if socket != server_socket and socket != sock :
            try :
                socket.send(message)
            except :
                # broken socket connection
                socket.close()
                # broken socket, remove it
                if socket in SOCKET_LIST:
                    SOCKET_LIST.remove(socket)

if __name__ == "__main__":

    sys.exit(chat_server())
